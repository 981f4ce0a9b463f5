"""The wire: topics, message schemas, the tensor frame codec and the MQTT transport.

Both sides import from here and nowhere else build a topic string or parse bytes.
"""
