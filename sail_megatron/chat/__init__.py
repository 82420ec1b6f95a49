"""`sail-chat`: ask a trained model about images from the command line, through the trainer's own
tokenizer, chat template, tiling, image-token expansion and forward.

    source.py    what --ckpt is (a training run, one of its checkpoints, a sail-convert checkpoint, or a
                 Hugging Face InternVL-chat folder) and how its data was rendered
    loading.py   the one-process group and the model with the source's weights
    prompt.py    images -> tile plans, the conversation -> prompt ids, the training Batch
    generate.py  greedy decoding (the vision encoder runs once per answer)
    cli.py       the command line
"""
