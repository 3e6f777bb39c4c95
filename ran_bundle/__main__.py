"""``python -m ran_bundle [register|warp] ...``: the ``ran-register`` (default) and ``ran-warp`` commands."""

from ran_bundle.cli import main

if __name__ == "__main__":
    main()
