"""A memory plan before anyone trains: each site's peak, the bytes of a round, the server's aggregation."""

from florist.planning.memory import GIB, ServerMemory, SiteMemory, SiteTraining, aggregation_memory, site_memory, weight_bytes
from florist.planning.shapes import ModelShape

__all__ = ["GIB", "ModelShape", "ServerMemory", "SiteMemory", "SiteTraining", "aggregation_memory", "site_memory", "weight_bytes"]
