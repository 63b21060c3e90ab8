"""Train or evaluate a gencnp system: ``python train.py fit|validate|test|predict --config CONFIG``."""

from gencnp.cli import main

if __name__ == "__main__":
    main()
