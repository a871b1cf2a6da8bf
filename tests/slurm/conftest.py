def pytest_collection_modifyitems(config, items):
    """Keep the SLURM tests on one xdist worker (they share one local cluster).

    xdist 3.8's ``--dist loadgroup`` tags grouped items through ``item._nodeid``, which pytest 9
    no longer reads (node ids live in ``item._id``), so the groups were silently ignored and the
    tests spread over workers: tag the ``xdist_group`` items of this directory ourselves."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import coerce_node_id
    except ImportError:  # older pytest: xdist's own tagging works
        return
    for item in items:
        names = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
        )
        if names and "@" not in item.nodeid.rsplit("]", 1)[-1]:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")
