"""`flywheel browse`: a local, read-only web page over the registry, to read preference pairs and their lineage side
by side, and to label them (agree / disagree / flag) for the report's judge-vs-human agreement.

    queries.py   the SQL: runs, an iteration's pairs (sorted, filtered, paged in SQL), labels, the one write
    pages.py     the server-rendered HTML
    server.py    the stdlib HTTP server: read-only per request, bound to exactly the host given (127.0.0.1)
    export.py    an iteration's pairs as Argilla 2.x records (`--export-argilla`)
"""
