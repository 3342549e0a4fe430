package org.deepep4j.samediff;

import org.nd4j.linalg.factory.Nd4j;

/** Starts ND4J with its own executioner, then asks for the deepep4j one; prints what install() said. */
public final class InstallPeer {
  public static void main(String[] args) {
    Nd4j.create(1);
    try {
      DeepEp.install();
      System.out.println("INSTALLED");
    } catch (IllegalStateException e) {
      System.out.println("REFUSED: " + e.getMessage());
    }
    System.exit(0);
  }
}
