"""`python -m workers [--teacher NAME]`: run one worker (also `teachercache worker`)."""

from workers.cli import main

if __name__ == "__main__":
    main()
