"""Tools around the library: the `jeplb` command, the demo, the benchmarks and the numpy
reference policy they compare against. `import jeplb` imports none of this."""
