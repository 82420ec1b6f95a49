"""Parameter counts of the named model presets (`sail_megatron/config/presets.py`).

`python -m sail_megatron.model.presets` prints each preset's parameters by part without
allocating any weight.
"""

import argparse

from sail_megatron.config.presets import PRESETS, get_preset  # noqa: F401  (re-exported for callers)
from sail_megatron.model.param_count import count_parameters


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(PRESETS), help="presets to count (default: all)")
    args = parser.parse_args(argv)
    header = (
        f"{'preset':<20}{'vision built':>16}{'vision ckpt':>16}{'projector':>14}{'language':>16}"
        f"{'lang. active':>16}{'total built':>16}{'total ckpt':>16}"
    )
    print(header)
    for name in args.names:
        c = count_parameters(get_preset(name))
        print(
            f"{name:<20}{c.vision_built:>16,}{c.vision_checkpoint:>16,}{c.projector:>14,}{c.language:>16,}"
            f"{c.language_active:>16,}{c.total_built:>16,}{c.total_checkpoint:>16,}"
        )
    print("vision built: layers up to select_layer; ckpt: all layers, as the released checkpoint stores them")
    print("lang. active: language parameters one token uses (a mixture of experts runs top-k of its experts)")


if __name__ == "__main__":
    main()
