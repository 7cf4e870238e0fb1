"""
The mbox message store: one mboxrd file per folder under the mail directory,
an sqlite index per folder under the index directory (see
L{mailsrv.store.index}), dotlock + fcntl locking (L{mailsrv.store.locking}).
Disk work runs on the thread pool, ordered per folder by a serial queue.

Its parts, one job each:

    store.py      L{MboxMailStore}: ties the parts together (L{IMailStore})
    state.py      a folder's in-memory state: snapshot, read handles, serial queue
    cache.py      the loaded folders; jobs, install, listeners and the poll
    scan.py       the one tail scan and index-row builder (index <- file)
    journal.py    the append journal and the append under the lock
    deliver.py    delivery with group commit (L{mailsrv.groupcommit})
    folders.py    folder create, delete, rename, list
    view.py       L{MboxFolder}: a session's view (L{IFolder})
    inplace.py    running a journaled in-place rewrite, finishing a broken one
    expunge.py    the expunge rewrite
    flagwrite.py  writing changed flags into Status:/X-Status:
    files.py      small file-system helpers
"""

from mailsrv.store.mbox.cache import IDLE_STATES, POLL_INTERVAL
from mailsrv.store.mbox.expunge import store_expunge
from mailsrv.store.mbox.flagwrite import store_write_flags
from mailsrv.store.mbox.store import MboxMailStore
from mailsrv.store.mbox.view import MboxFolder

__all__ = [
    "IDLE_STATES",
    "POLL_INTERVAL",
    "MboxFolder",
    "MboxMailStore",
    "store_expunge",
    "store_write_flags",
]
