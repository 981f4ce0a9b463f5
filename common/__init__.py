"""The bottom layer: logging set-up, the settings loader and the /metrics endpoint.

Both sides (edge_agent/, aggregator/) and the tools on top (edgetune/) use it; it imports
nothing of the project (no broker/, aggregator/, edge_agent/ or edgetune/).
"""
