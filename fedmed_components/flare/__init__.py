"""The thin FLARE layer: controller, aggregators, persistor, filters, job builder, and the
POC / provisioning wrappers that deploy it.

Everything here adapts FLARE's interfaces to the pure core (`fedmed_components.*`);
swapping FLARE versions should touch only this package.
"""
