"""
The server's metrics in Prometheus's text format: counters of what the
server did (mail received, delivered, deferred, bounced and rejected by
reason; connections, logins, filter verdicts), gauges read at scrape (the
queue), and the store's delivery latency, in one L{CollectorRegistry} per
server, served on C{[metrics] listen}.

    settings.py   the [metrics] section
    registry.py   the metrics themselves (L{MailMetrics}) and the queue's figures
    events.py     counts from the server's structured log events
    service.py    wiring: the log observer, the listener, hooks at the seams
    relaycounts.py  in the relay process: its delivery results, sent to the server
"""
