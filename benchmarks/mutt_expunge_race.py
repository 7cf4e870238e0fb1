"""
Soak check: mutt saves messages into an INBOX (its FCC opens the mbox for appending before it
locks) while an IMAP client expunges one message a second; every save must arrive.

    python3 benchmarks/mutt_expunge_race.py SERVER_FOLDER [SAVES]

Needs a running server with the built-in default config started in SERVER_FOLDER (SMTP 2525,
IMAP 2143) and the user alice@example.test with password "pw"; fills INBOX with 3,000 messages
of about 10 KB first. Talks to 127.0.0.1 only.
"""

import imaplib
import mailbox
import os
import smtplib
import subprocess
import sys
import threading
import time
from email.message import EmailMessage


def main() -> None:
    root = sys.argv[1]
    saves = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    inbox = f"{root}/data/mail/example.test/alice/INBOX"
    s = smtplib.SMTP("127.0.0.1", 2525)
    body = ("x" * 70 + "\n") * 140
    for i in range(3000):
        m = EmailMessage()
        m["From"] = "a@remote.test"
        m["To"] = "alice@example.test"
        m["Subject"] = f"filler {i}"
        m.set_content(body)
        s.send_message(m)
    s.quit()
    time.sleep(1)
    print("INBOX bytes", os.path.getsize(inbox))
    rc = f"{root}/muttrc"
    with open(rc, "w") as f:
        f.write(
            f'set copy=yes\nset record="{inbox}"\nset sendmail="/bin/true"\n'
            'set mbox_type=mbox\nset from="m@x.test"\n'
        )
    codes: list[int] = []

    def mutt() -> None:
        for i in range(saves):
            p = subprocess.run(
                ["mutt", "-F", rc, "-s", f"fcc {i}", "nobody@x.test"],
                input=b"saved by mutt\n",
                capture_output=True,
            )
            codes.append(p.returncode)
            time.sleep(0.3)

    t = threading.Thread(target=mutt)
    t.start()
    c = imaplib.IMAP4("127.0.0.1", 2143)
    c.login("alice@example.test", "pw")
    c.select("INBOX")
    k = 0
    while t.is_alive():
        c.store(str(1 + (k * 37) % 2000), "+FLAGS", r"(\Deleted)")
        c.expunge()
        k += 1
        time.sleep(1)
    t.join()
    c.noop()
    _, data = c.search(None, "SUBJECT", '"fcc "')
    found = len(data[0].split())
    print(
        f"mutt saves: {len(codes)} (exit codes {set(codes)}), expunges: {k}, found over IMAP: {found}"
    )
    c.logout()
    raw = sum(1 for m in mailbox.mbox(inbox) if (m["Subject"] or "").startswith("fcc "))
    print("found in the raw file:", raw)


if __name__ == "__main__":
    main()
