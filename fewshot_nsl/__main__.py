"""``python -m fewshot_nsl`` is the ``fewshot-nsl`` command."""

from fewshot_nsl.cli.main import main

if __name__ == "__main__":
    main()
