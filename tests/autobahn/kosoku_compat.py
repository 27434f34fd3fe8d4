"""Runs kosoku (the Autobahn cases, PyPI) with one mend to its compression
cases, then exits as kosoku would.

kosoku 0.1.x hands every echoed message to the 12.x/13.x cases' onMessage
as a `str` (text decoded, binary as one character per byte), and those
cases hash it as bytes ("Strings must be encoded before hashing"): every
one of them ends as ERROR before judging the server. The mend turns the
`str` back into the bytes received, which is what the cases were written
for; nothing else of kosoku changes. Usage: python3 kosoku_compat.py KOSOKU-ARGS...
"""

import sys

import kosoku.cases  # builds the case index
from kosoku._cli import main


def _bytes_for(on_message):
    def on_message_bytes(self, msg, binary):
        if isinstance(msg, str):
            # A text message comes decoded (12.4's HTML is not ASCII); a
            # binary one as one character per byte (12.2's bitmap), which
            # latin-1 turns back into those bytes unchanged.
            msg = msg.encode("latin-1" if binary else "utf-8")
        return on_message(self, msg, binary)

    return on_message_bytes


# The index holds the classes of its own import of the case files.
for case in kosoku.cases.CASES.values():
    if case.__module__.endswith("case12_x_x"):
        case.onMessage = _bytes_for(case.onMessage)

if __name__ == "__main__":
    sys.argv[0] = "kosoku"
    main()
