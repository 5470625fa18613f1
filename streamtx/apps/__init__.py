"""The top wing: what a person runs. Command-line entry points (``streamtx ...``), the demo's orchestration, and the
wiring of the library's policies into the daemon (``streamtx_server``) and its client (``streamtx_client``).

Imports run one way: ``symmetry -> nn -> models -> policy -> (checkpoint, train, tasks) -> apps``; the daemon and the
client SDK know nothing of the library (the daemon serves any policy with its numpy interface), and only this wing
imports them together with the library.
"""
