"""The kind end-to-end suite (`make e2e`): a real cluster, both images, the chart, injected pods at 2/2."""
