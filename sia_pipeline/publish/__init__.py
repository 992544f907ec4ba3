"""Publish/inspect stage: rebuild, verify and publish an SIA dataset; look inside one."""
