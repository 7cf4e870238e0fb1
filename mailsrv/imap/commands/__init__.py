"""
The IMAP commands, grouped by what they work on: mailboxes (general,
mailboxes), the selected mailbox (selected, fetch), IDLE. Each group is a
mixin of L{mailsrv.imap.server.IMAPServer}; L{base} has what they share.
"""
