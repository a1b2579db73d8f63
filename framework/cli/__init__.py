"""The command-line tools, one module each (`python -m memfit.cli.<tool>`, or the `memfit-<tool>` scripts):

    evaluate     score a model on the task suite or JSONL files, without training
    transfer     the Trans-LoRA pipeline (also `python -m memfit.transfer`)
    fmdelta      FM-Delta: compress / decompress / verify / stats of fine-tuned weights against their base
    neuzip       NeuZip compressibility statistics of a model directory
    consolidate  a (sharded) training checkpoint to a plain HF model directory

Training itself is the app, `python -m memfit.train` (`./launch.sh`). User errors end in one line and exit code 1
(`errors.run_cli`); a traceback means a bug of ours.
"""
