"""``python -m lightning_adafisher.bench <name>``: the same as ``lightning-adafisher bench <name>``."""

from lightning_adafisher.bench import main

if __name__ == "__main__":
    main()
