"""The durable spool: a ``250`` in spool mode means the message is on disk.

Modelled on Postfix's queue. One directory per state; a message is one file
(:mod:`mailbridge.spool.record`), named by its queue id, in exactly one of::

    <spool.directory>/
      lock       flock()ed by the running bridge for its whole life (holds its pid)
      tmp/       files being written, and delivered files kept for reuse; never mail
                 (removed at start)
      queue/     accepted, waiting: due now ("queued") or later ("deferred")
      active/    claimed by the bridge's worker: an attempt is in flight
      dead/      dead letters: kept until retried or purged
      incoming/  manual retries handed over by ``mailbridge spool retry``
      corrupt/   damaged files, moved aside at start or when read (never mail)

Acceptance (:mod:`~mailbridge.spool.commit`, group commit): write
``tmp/<id>``, ``fdatasync`` it, rename it into ``queue/``, ``fsync`` ``queue/``,
and only then answer ``250``. Concurrent sessions share the sync rounds.

Who may do what (the protocol that makes the command line safe on a running
bridge; every move is one atomic ``rename``):

- Only the process holding ``lock`` (the bridge) writes files: it creates them
  in tmp/, appends ``STATE`` records to files it has taken, and moves
  queue/ → active/ → queue/ | dead/ | removed. Appends are not synced: losing
  one repeats a delivery with the same id. One shortcut: a message's first
  attempt, right after acceptance, runs from queue/ (two renames fewer per
  message); a command that moves or purges it meanwhile makes the bridge's
  append fail (``ENOENT``, appends never create files) and the bridge forgets
  the entry; at worst the message is delivered once more (same id) or, when
  purged with ``--force`` mid-attempt, delivered anyway.
- ``mailbridge spool`` never writes into a file. ``retry`` renames a file from
  dead/ or queue/ to incoming/; the bridge picks incoming/ up within a second,
  resets the retried routes (due now, attempts and age restart) and queues
  it. ``purge`` unlinks a file in dead/ (or, with ``--force``, queue/). Files in
  active/ are the bridge's: the command line refuses them while the lock is
  held. If the bridge renames a file first, the command's rename fails
  (``ENOENT``) and it reports that; if the command is first, the bridge's
  claim fails and it forgets the entry. Either way one side wins, whole.
- Without a running bridge the command takes the lock itself for the
  operation (a starting bridge waits for it) and may then touch active/ too.

Recovery at start (holding the lock): tmp/ is emptied (those writes were never
acknowledged), active/ goes back to queue/, incoming/ is reset and queued, and
every file is read and checked: no end marker or a bad checksum → corrupt/,
counted in ``mailbridge_spool_corrupt_files_total``.

Known limits: one bridge per directory (the lock enforces it); a spool is not
shared between pods. ``spool.fsync=false`` is for tests and benchmarks only.
"""
