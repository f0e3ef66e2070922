"""_serving"""
