"""``python -m clipguard`` runs the command line."""

from clipguard._entry import main

main()
