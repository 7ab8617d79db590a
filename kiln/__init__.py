__version__ = "0.1.0"
# The bhatti API kiln serves (X-Bhatti-Version): bhatti's v2 routes and fields, as docs/decisions.md lists
BHATTI_API_VERSION = "2.0.0"
