"""A third-party Fluent client for the tests: PyPI fluent-logger, sending N events into the
collector. Usage: fluent_sender.py HOST PORT TAG N. Exits non-zero if any emit failed."""
import sys

from fluent import sender

host, port, tag, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
logger = sender.FluentSender(tag, host=host, port=port, timeout=5.0)
failed = 0
for i in range(n):
    if not logger.emit("event", {"n": i, "from": "fluent-logger", "blob": b"\xff\x00".hex()}):
        failed += 1
        print(logger.last_error, file=sys.stderr)
logger.close()
sys.exit(1 if failed else 0)
