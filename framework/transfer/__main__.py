"""`python -m memfit.transfer`: the Trans-LoRA pipeline's command (memfit.cli.transfer)."""

from memfit.cli.transfer import main

if __name__ == "__main__":
    main()
