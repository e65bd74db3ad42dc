"""``python -m lightning_adafisher.diagnostics <command> --out DIR``: the same as
``lightning-adafisher diagnostics <command> ...`` (see ``--help``)."""

from lightning_adafisher.diagnostics.commands import main

if __name__ == "__main__":
    main()
