"""federatls.integrations: federatls identities handed to the libraries services already use.

Each integration is a module of its own, imported only when used, so the core never imports
an optional dependency: ``federatls.integrations.streams`` (asyncio streams).
"""
