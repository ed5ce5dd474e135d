"""Where images enter: watched folders and MQTT topics. Both only record images in the durable queue."""
