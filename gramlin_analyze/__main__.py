import sys

from gramlin_analyze.cli import main

if __name__ == "__main__":
    sys.exit(main())
