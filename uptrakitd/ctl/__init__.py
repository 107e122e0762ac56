"""`uptrakitctl`: the operator's command line (commands.py), over the HTTPS API (client.py), with tables and JSON
(output.py), rotation progress (progress.py), and the local backup and restore of a data dir (backup.py)."""
