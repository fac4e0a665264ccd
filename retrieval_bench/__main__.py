"""``python -m retrieval_bench`` is the ``retrieval-bench`` command."""
from .cli import main

main()
