"""The operator's console at ``/_admin/``: a live dashboard, its JSON API, and admin actions.

``api`` answers the HTTP requests (the router hands it every ``/_admin`` path); ``access`` decides
who may come in and checks that actions come from the page (CSRF); ``snapshot`` reads the server's
state into the API's documents; ``events`` streams changes to open pages; ``actions`` disconnects,
blocks, unblocks and drains. The page itself is in ``static/``, shipped in the package.

This package imports nothing at import time: the request path imports none of it.
"""
