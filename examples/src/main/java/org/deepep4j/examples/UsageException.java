package org.deepep4j.examples;

/** A command-line flag that is unknown, malformed or out of range; the CLI prints it with the usage and exits with 2. */
public final class UsageException extends Exception {
    public UsageException(String message) {
        super(message);
    }
}
