"""The backdoor lab: small clean and backdoored CLIP models, their data sets and model cards.

A plugin of the ``clipguard`` distribution (entry point ``lab``, :mod:`clipguard.lab.plugin`):
it imports the core, never the other way round, and registers its trigger families and the
``clipguard lab ...`` and ``clipguard demo`` commands through the plugin hooks.
"""
