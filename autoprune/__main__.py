from autoprune.cli import main

if __name__ == "__main__":  # not when a --workers process is spawned from it
    raise SystemExit(main())
