"""Online serving on Ray Serve: ``mmembed serve --ray [ADDRESS]``, or ``serve run
mmembed.serving:app_builder`` with Ray's own tooling. See ``serving.app``."""

from mmembed.serving.app import app_builder, build_app

__all__ = ["app_builder", "build_app"]
