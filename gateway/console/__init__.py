"""`gateway console`: the read-only web console for analysts and assessors (issue 13).

Server-rendered pages (aiohttp, Jinja2 with autoescaping) over the same queries as the CLI, charts
drawn as inline SVG on the server, one small script for the live violations feed. Nothing is
fetched from outside: every style and script ships in the wheel.
"""
