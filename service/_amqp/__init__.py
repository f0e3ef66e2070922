"""_amqp"""
