"""Models: the compact CNN, the ``keras.applications`` backbones, and the class activation map
in the graph."""
