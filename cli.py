"""`python cli.py ...` in a checkout is the same as the `retrieval-bench ...` console script."""
from retrieval_bench.cli import main

if __name__ == "__main__":
    main()
