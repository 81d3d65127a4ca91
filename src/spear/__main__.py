"""``python -m spear`` runs the command line."""

from spear.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
