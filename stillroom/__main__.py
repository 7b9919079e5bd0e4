"""`python -m stillroom ...`: the CLI, also as `torchrun --nproc_per_node N -m stillroom train NAME`."""

from stillroom.cli.main import main

if __name__ == "__main__":
    main()
