"""The thin FLARE layer: controller, aggregators, persistor, filters and job builder.

Everything here adapts FLARE's interfaces to the pure core (`fedmed_components.*`);
swapping FLARE versions should touch only this package.
"""
