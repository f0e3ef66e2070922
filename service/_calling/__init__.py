"""_calling"""
