"""`python -m titanmm.demo`: see titanmm/demo/run.py."""

from titanmm.demo.run import main

if __name__ == "__main__":
    main()
