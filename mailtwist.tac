"""Run mailtwist with ``twistd -ny mailtwist.tac``: the same service as ``twistd mailtwist``,
configured by ./mailtwist.toml (or the file named by $MAILTWIST_CONFIG) and its defaults."""

import os

from twisted.application import service

from mailtwist.config import load_config
from mailtwist.tap import build_service

application = service.Application("mailtwist")
build_service(load_config(os.environ.get("MAILTWIST_CONFIG"))).setServiceParent(application)
