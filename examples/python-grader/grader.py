"""Grade handin.py: each test is worth the same; the last line is Autolab's score JSON."""
import json

import handin

TESTS = [(0, 0), (1, 1), (2, 1), (10, 55), (30, 832040)]
passed = 0
for n, want in TESTS:
    got = handin.fib(n)
    ok = got == want
    passed += ok
    print(f"fib({n}) = {got} {'ok' if ok else f'expected {want}'}")
print(json.dumps({"scores": {"fib": round(100 * passed / len(TESTS))}}))
