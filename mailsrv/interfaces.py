"""
The seams between mailsrv's parts.

Users are named by their full address, ``local@domain`` with the domain in
lower case. Folder names are IMAP names with ``/`` as hierarchy delimiter;
``INBOX`` is the user's inbox (matched case-insensitively).

Every method that touches the disk returns a Deferred: the store runs disk
work off the reactor thread, ordered per folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from zope.interface import Attribute, Interface

# IMAP system flags, as stored.
SEEN = "\\Seen"
ANSWERED = "\\Answered"
FLAGGED = "\\Flagged"
DELETED = "\\Deleted"
DRAFT = "\\Draft"
SYSTEM_FLAGS = frozenset({SEEN, ANSWERED, FLAGGED, DELETED, DRAFT})


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """What the index knows of one message in a folder."""

    uid: int
    size: int  # octets of the message with CRLF line ends (RFC822.SIZE, POP3 size)
    flags: frozenset[str]  # system flags and keywords; never \\Recent
    internal_date: float  # seconds since the epoch
    # RFC 7162 3.1: the folder's mod-sequence of the message's last change (arrival or
    # flags); 0 where a store keeps none
    modseq: int = 0


@dataclass(frozen=True, slots=True)
class FolderChanges:
    """What L{IFolder.refresh} found changed since the session's last look."""

    added: tuple[MessageInfo, ...] = ()
    expunged: tuple[int, ...] = ()  # UIDs, in the order they were in the folder
    flags: tuple[MessageInfo, ...] = ()  # messages whose flags changed
    uid_validity_changed: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.expunged or self.flags or self.uid_validity_changed)


class FlagResult(dict):
    """
    What L{IFolder.change_flags} did: UID -> the flags now, for each message of
    the request that still exists (those that failed the condition too), and
    per message the mod-sequence now (RFC 7162 3.1), which messages got new
    flags, which were left alone because they changed after C{unchanged_since}
    (RFC 7162 3.2: the MODIFIED response code).
    """

    def __init__(
        self,
        flags: dict[int, frozenset[str]] | None = None,
        modseqs: dict[int, int] | None = None,
        changed: frozenset[int] = frozenset(),
        failed: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(flags or {})
        self.modseqs: dict[int, int] = modseqs or {}  # UID -> modseq now (every key)
        self.changed = frozenset(changed)  # flags changed: each got a new modseq
        self.failed = frozenset(failed)  # modseq > unchanged_since: not touched


class IMessageSource(Interface):
    """
    The bytes of one message waiting to be stored: LF line ends, no mbox
    quoting, no ``From `` line. Spooled on disk or held in memory.
    """

    size = Attribute("int: the number of bytes open() yields")

    def open():
        """Return a new binary file object positioned at the start."""


class IFolder(Interface):
    """
    One session's view of a folder. It holds the list of messages the session
    has been shown; it changes only when the session calls L{refresh}, which
    reports what others changed meanwhile (so IMAP can send EXISTS, EXPUNGE and
    FETCH, and POP3 can keep its snapshot).

    Threads: the attributes and the methods marked "reactor thread" are cheap
    and in memory, and are called on the reactor thread. Those that return a
    Deferred are called on the reactor thread too and do their disk work in
    the store's thread pool. L{open_message} and L{read_headers} read message
    bytes from the disk and block: call them (and read the files they return)
    in a pool thread, never on the reactor thread.
    """

    user = Attribute("str: the owner's address")
    name = Attribute("str: the folder's name (INBOX for the inbox)")
    uid_validity = Attribute("int: UIDVALIDITY, changes only when UIDs were lost")
    uid_next = Attribute("int: the UID the next message will get")
    read_only = Attribute("bool: opened read-only (EXAMINE)")
    highest_modseq = Attribute(
        "int: HIGHESTMODSEQ (RFC 7162 3.1.1), the folder's mod-sequence counter: the"
        " modseq of its last change (a message's flags, a new message, an expunge); it"
        " only grows under one UIDVALIDITY, starts at 1, and is the folder's as the"
        " store knows it now (the session's view catches up at refresh)"
    )

    def messages():
        """
        Return the session's list of L{MessageInfo}, in folder order (seq =
        index + 1). Reactor thread: in memory.
        """

    def refresh():
        """
        Catch up with the disk and with other sessions. Fires with
        L{FolderChanges}; afterwards L{messages} shows the new state. Reactor
        thread; returns a Deferred, the disk work (a stat, a scan of what
        changed) runs in the pool.
        """

    def open_message(uid):
        """
        Return a binary file object reading message C{uid} with CRLF line
        ends, exactly C{size} octets, streamed from disk. Raise KeyError if
        the message is gone. Pool thread only: opening reads the disk (a
        small message whole), and so does reading the file.
        """

    def read_headers(uid):
        """
        Return the message's header block (CRLF, up to and including the blank
        line). Pool thread only: reads the disk. Raise KeyError if it is gone.
        """

    def set_flags(changes):
        """
        C{changes} maps UID to the new full set of flags. Fires when stored;
        other sessions see the change at their next refresh. Reactor thread;
        the session's view changes at once, the index is written in the pool.
        """

    def change_flags(
        uids, add=frozenset(), remove=frozenset(), unchanged_since=None, replace=False
    ):
        """
        Add C{add} to and then take C{remove} from the flags of the messages
        C{uids} as they are now, with every other session's changes (a
        read-modify-write in the folder's order: none is lost). Fires with a
        L{FlagResult} (a dict UID -> the flags now, for the messages that
        still exist); the session's view shows those at once. A message whose
        flags change gets one new modseq, shared by all changed in this call
        (RFC 7162 3.1); one whose flags stay as they were keeps its modseq.
        With C{unchanged_since} (RFC 7162 3.2 UNCHANGEDSINCE), a message whose
        modseq is greater is left alone and listed in C{failed}; the test and
        the change are one step in the folder's order. With C{replace}, the
        flags become C{add} whatever they were (STORE FLAGS under UNCHANGEDSINCE,
        RFC 3501 6.4.6). Reactor thread.
        """

    def changed_since(modseq):
        """
        Fire with a list of C{(uid, modseq, flags)}, in UID order, of the
        messages whose modseq is greater than C{modseq} (RFC 7162 3.3.1
        CHANGEDSINCE), as the folder is now: messages the session's view does
        not hold yet may be among them (refresh first, skip UIDs not in the
        view). Costs work in proportion to the changes, not the folder.
        Reactor thread.
        """

    def vanished_since(modseq):
        """
        Fire with the sorted UIDs expunged with a modseq greater than
        C{modseq} (RFC 7162 3.6 VANISHED (EARLIER)), or None when the store no
        longer knows every such expunge (its history is bounded, oldest
        dropped first): the caller must then fall back (to the UIDs the client
        names that are gone). UIDs the client never knew may be among them.
        Reactor thread.
        """

    def claim_recent():
        """
        \\Recent (RFC 3501 2.3.2): give this session the messages of its view
        that no session has been given yet. Fires with C{(first, next)}: the
        messages of the view with C{first <= uid < next} are recent to this
        session, and no other session gets them. A read-only folder (EXAMINE)
        takes nothing away: it fires with those no session has had yet, which
        stay for the next. The store keeps what was given (across restarts),
        at O(1) cost. Reactor thread.
        """

    def append(source, flags=frozenset(), internal_date=None):
        """
        Append an L{IMessageSource} durably; fires with the new UID. Reactor
        thread; the append runs in the pool.
        """

    def append_many(items):
        """
        Append several messages, each C{(source, flags, internal_date)}, as
        one: all are stored durably or none is (RFC 3502 MULTIAPPEND; a crash
        part way leaves none). Fires with their new UIDs, in order. Reactor
        thread; the append runs in the pool.
        """

    def expunge(uids):
        """
        Remove the messages with these UIDs from the folder, durably. Fires
        with the UIDs actually removed, in folder order. Reactor thread; the
        rewrite runs in the pool.
        """

    def add_listener(callback):
        """
        Call C{callback()} (on the reactor thread) whenever the folder changes.
        Reactor thread: in memory (the store may start polling the file).
        """

    def remove_listener(callback):
        """Stop calling C{callback}. Reactor thread: in memory."""

    def close():
        """
        End the session's use of the folder (release files, listeners).
        Reactor thread; work it leads to (writing changed flags into the
        file) is queued in the pool.
        """


class IMailStore(Interface):
    """All users' folders."""

    mail_folders_hold_folders = Attribute(
        "bool: whether a folder that holds messages can also hold folders (an mbox "
        "file cannot: only a folder created to hold folders can, and it holds no mail)"
    )

    def deliver(user, source, sender, folder="INBOX"):
        """
        Append an L{IMessageSource} to a user's folder for SMTP: durably (fsync)
        before the Deferred fires. Concurrent deliveries to one folder share a
        lock and an fsync. C{sender} is the envelope sender ('' for <>), used
        in the mbox ``From `` line. Fires with None.
        """

    def list_folders(user):
        """
        Fire with a sorted list of (name, selectable) pairs, INBOX included; a
        name that holds only folders is not selectable.
        """

    def create_folder(user, name):
        """
        Create a folder (and the hierarchy above it); a name that ends in the
        delimiter creates one that holds only folders (RFC 3501 6.3.3). Fails
        with FolderError if it exists or is invalid.
        """

    def delete_folder(user, name):
        """
        Delete a folder and its messages, or a folder that holds only folders
        once it holds none (RFC 3501 6.3.4). INBOX cannot be deleted.
        """

    def rename_folder(user, old, new):
        """Rename a folder (with its children); renaming INBOX moves its messages."""

    def open_folder(user, name, read_only=False):
        """Fire with an L{IFolder}, or fail with FolderError(NO_SUCH_FOLDER)."""

    def folder_status(user, name):
        """
        Fire with a dict: messages, uid_next, uid_validity, unseen, recent (the
        messages no session has been given as \\Recent yet, L{IFolder.claim_recent}),
        highest_modseq (RFC 7162 3.1.2.1 STATUS HIGHESTMODSEQ, L{IFolder.highest_modseq}),
        deleted (the messages flagged \\Deleted) and size (the sum of their
        RFC822.SIZE), RFC 9051 6.3.11.
        """

    # --- the user's change feed (IMAP NOTIFY, RFC 5465) ---------------------

    def add_user_listener(user, callback):
        """
        Call C{callback(event)} (a L{FolderEvent}, on the reactor thread) when
        one of C{user}'s folders changes through this store: its messages
        (delivered, appended, expunged, flags changed, by any session or
        protocol), or the folder itself (created, deleted, renamed). Changes
        other programs make to the files are found only in folders the store
        is watching anyway (a folder some session has open is polled): the
        feed polls nothing of its own. In memory; reactor thread.
        """

    def remove_user_listener(user, callback):
        """Stop calling C{callback} for C{user}'s changes. In memory; reactor thread."""

    def recover_pending():
        """
        At start-up: finish the work a crash left half done in any folder, so
        other programs see whole files. Never fails; fires with the number of
        folders recovered.
        """

    def write_back(timeout):
        """
        At shutdown, before the disk thread pool stops: write to the files
        what the store holds elsewhere only (flags sessions changed), waiting
        at most C{timeout} seconds. Never fails.
        """


# The kinds of L{FolderEvent} (L{IMailStore.add_user_listener}).
FOLDER_MESSAGES = "messages"  # messages came, went, or had their flags changed
FOLDER_CREATED = "created"
FOLDER_DELETED = "deleted"
FOLDER_RENAMED = "renamed"  # old_name says from where


@dataclass(frozen=True, slots=True)
class FolderEvent:
    """One change in a user's folders, as the store's user feed tells it."""

    kind: str  # FOLDER_MESSAGES, FOLDER_CREATED, FOLDER_DELETED, FOLDER_RENAMED
    name: str  # the folder's name (its new name after a rename)
    old_name: str | None = None  # FOLDER_RENAMED: the name it had


class FolderError(Exception):
    """A folder operation that cannot be done; ``str()`` is safe to show a client."""


class NotSelectable(FolderError):
    """The name holds only folders (IMAP's \\Noselect): it cannot be opened or given mail."""

    def __init__(self, text: str = "Mailbox isn't selectable") -> None:
        super().__init__(text)


class IPasswordDatabase(Interface):
    """The users who own mailboxes, and their hashed passwords."""

    def lookup(address):
        """
        Return the stored spelling of C{address}, its local part matched in any
        case, or None if no such user (sync; cached file read). The stored
        spelling names the user everywhere: avatars, mailboxes, logs. Raises
        L{PasswordDatabaseError} if the users cannot be read.
        """

    def has_user(address):
        """Return whether C{address} is a known user (sync; cached file read)."""

    def verify(address, password):
        """Fire with True or False; hashing runs off the reactor thread."""


class PasswordDatabaseError(Exception):
    """
    Raised (or failed with) by L{IPasswordDatabase} when the users cannot be
    read: a local problem, answered as temporary (SMTP 451 4.3.0 or 454
    4.7.0), never as "no such user" or "wrong password".
    """


class IOutboundQueue(Interface):
    """The on-disk queue of mail for remote recipients."""

    def enqueue(sender, recipients, source, *, smtputf8=False, queue_id=None):
        """
        Store a message and its envelope durably (fsync, atomic rename) for
        delivery to C{recipients} (a list of addresses). Fires with the queue id:
        C{queue_id} (the id the message was received under) or a new one.
        C{smtputf8}: the message was received with SMTPUTF8 (RFC 6531); the
        envelope keeps it, for the relayer's next hop.
        """


class IDeliveryTarget(Interface):
    """
    Where routed mail is finally put (a local mailbox, the outbound queue),
    in two phases as in maddy's C{module.DeliveryTarget}: L{start} a
    delivery, add its recipients, give it the body, then commit or abort.
    Nothing is written before L{IDelivery.commit}, so an aborted delivery
    leaves nothing behind.
    """

    def start(sender):
        """
        Begin delivering a message from envelope sender C{sender} ('' for <>).
        Return an L{IDelivery}.
        """


class IDelivery(Interface):
    """One message on its way into an L{IDeliveryTarget}."""

    def add_recipient(recipient):
        """
        Add a recipient: a routing decision of the kind this target takes
        (L{mailsrv.routing.Mailbox} for the store, L{mailsrv.routing.Relay}
        for the queue). Raise L{mailsrv.replies.ReplyError} if the target
        refuses it; a recipient added twice counts once.
        """

    def body(source):
        """Give the message, an L{IMessageSource}; it must stay readable until commit fires."""

    def commit():
        """
        Deliver to every recipient added: fire once every copy is durable
        (fsync), with a reference for the log (the queue id) or None, or
        fail. With no recipient, deliver nothing and fire with None.
        """

    def abort():
        """Give up before commit: nothing is written, nothing is left behind."""
