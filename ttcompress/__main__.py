"""``python -m ttcompress`` (also what ``torchrun -m ttcompress`` runs)."""

from ttcompress.cli import main

if __name__ == "__main__":
    main()
