"""``python -m clipguard`` runs the command line."""

from clipguard.cli import main

main()
